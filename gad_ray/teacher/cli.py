"""``gad-fetch``: compose and validate the config (the fetcher lands with its issue)."""

from __future__ import annotations

from gad_ray.config import Config
from gad_ray.config.hydra_app import hydra_entry


def fetch(cfg: Config) -> None:
    """Fill a dataset with teacher responses."""
    print(f"gad-fetch: config for {cfg.name!r} is valid; fetching is not implemented yet.")


main = hydra_entry(fetch)

if __name__ == "__main__":
    main()
