"""The declarative policy: its language (``model``), checks (``check``), pure evaluation
(``evaluate``), dry runs (``explain``), shipped rule packs (``packs``) and the statement hook that
enforces grants on sessions (``enforce``)."""
