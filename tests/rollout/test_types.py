"""Per-sample seeds: one RNG stream per (request seed, prompt, sample)."""

from gad_ray.rollout.types import sample_seed


def test_sample_seeds_are_distinct_across_prompts_samples_and_steps():
    seeds = [sample_seed(s, i, j) for s in range(20) for i in range(32) for j in range(8)]
    assert len(set(seeds)) == len(seeds)  # seed + i + j would collide massively here
    assert all(0 <= x < 2**31 for x in seeds)
    assert sample_seed(7, 3, 1) == sample_seed(7, 3, 1)  # deterministic
    assert sample_seed(2**40 + 5, 0) != sample_seed(5, 0)  # the high bits of the seed count
