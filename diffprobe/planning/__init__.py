"""Planning: fingerprint -> plans.json, the single source of configuration."""
