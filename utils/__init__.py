"""Small helpers shared by the scripts and packages: errors, atomic writes, CLI plumbing."""
