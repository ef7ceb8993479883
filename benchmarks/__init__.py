"""`python -m imgft bench`: imgft against the upstream example's pipeline, and the recorded results."""
