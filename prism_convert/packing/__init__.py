"""Stage 4, `prism pack`: turn a bit plan over work folders into a .prism container."""
