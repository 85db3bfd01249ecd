"""The declarative policy: its language (``model``), checks (``check``), pure evaluation
(``evaluate``), dry runs (``explain``), shipped rule packs (``packs``) and the interim read-only guard
(``readonly``)."""
