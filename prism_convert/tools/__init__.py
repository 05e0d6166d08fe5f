"""Commands beside the conversion stages: eval, inspect, push, plan (fit) and run (generate)."""
