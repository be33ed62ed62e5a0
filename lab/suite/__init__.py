"""The tests that run inside the arm64 lab (see lab/README.md, "Adding a test")."""
