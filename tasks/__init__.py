"""The work itself: one module per capability, plain functions first."""
