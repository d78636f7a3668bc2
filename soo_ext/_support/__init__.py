"""What every layer of soo_ext shares; it imports torch only (never the rest of soo_ext)."""
