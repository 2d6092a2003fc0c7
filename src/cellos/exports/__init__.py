"""Export sinks (L3): where artifacts go."""
