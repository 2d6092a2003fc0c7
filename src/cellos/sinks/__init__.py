"""Event sinks (L3): where finished events go."""
