"""Great Expectations suites, one per stage output (filled in by the quality stage)."""
