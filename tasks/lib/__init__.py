"""Small shared library of the stages: HTTP client, text utilities, language ID."""
