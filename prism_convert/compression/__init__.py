"""Stage 2, `prism compress`: measure candidate encodings of every expert tensor into a work folder."""
