"""Planning calculators: closed-form parameter counts (``params``), later scaling laws and memory."""
