"""Great Expectations suites as code, one module per stage output (raw, experts, fused, translated, scores), each
with `SUITE` (= the output folder), `ROW_ID` (the columns naming a row) and `expectations(inputs)`; `runner` runs
a suite on one shard through a GX checkpoint and builds the data docs."""
