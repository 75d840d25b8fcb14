"""The fine-tuning attacker, below both `methods/` (the hardening simulates attacks) and `evaluation/` (which
grades with them): the recipe and its parser, the attack space every sampler draws from, the moves on a
start, one fine-tuning run and the stacked engine that trains many runs at once."""
from .moves import attack_start, bn_move, regrow_, reinit_head
from .recipe import NAMED_ATTACKS, AttackRecipe, parse_attack, scratch_recipe
from .run import StackRun, attack_run, fine_tune, scratch_model, train_run
from .space import ATTACK_SPACE, AttackSpace

__all__ = ["ATTACK_SPACE", "NAMED_ATTACKS", "AttackRecipe", "AttackSpace", "StackRun", "attack_run", "attack_start", "bn_move",
           "fine_tune", "parse_attack", "regrow_", "reinit_head", "scratch_model", "scratch_recipe", "train_run"]
