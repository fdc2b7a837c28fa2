"""Score networks: NCSN++-style time-conditioned U-Nets."""
