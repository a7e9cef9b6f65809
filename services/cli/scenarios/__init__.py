"""`edgesplit scenario run`: measured side-by-side runs of the static, migrate and adaptive
policies on fresh local stacks (docs/SCENARIOS.md)."""
