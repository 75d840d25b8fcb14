"""The fine-tuning attacker's building blocks, below both `methods/` (the hardening simulates attacks) and
`evaluation/` (which grades with them): one definition of each move on a starting model."""
