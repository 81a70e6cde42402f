"""Planning calculators, pure functions: parameter counts (``params``, ``mlp``), scaling laws (``scaling``), adapter storage (``memory``)."""
