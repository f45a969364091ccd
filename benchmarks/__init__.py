"""fastencoder's benchmark sweep (`fastencoder bench`) and its FLOP / byte counts."""
