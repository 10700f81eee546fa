"""Saltpeter: distributed cron for SaltStack fleets.

The package is the typed core that the Salt loader modules in ``_engines/``,
``_runners/``, ``_modules/`` and ``_states/`` call into.
"""

__version__ = "0.1.0"
