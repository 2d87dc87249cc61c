"""Pure pandas over a sweep's Parquet tables (never imports torch, never recomputes a metric)."""
