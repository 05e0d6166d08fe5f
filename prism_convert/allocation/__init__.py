"""Stage 3: the bit allocation — one candidate per expert tensor under a byte budget (the bit plan)."""
