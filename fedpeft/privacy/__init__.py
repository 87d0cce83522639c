"""Differential privacy (see :class:`fedpeft.config.PrivacyConfig` for the levels and settings).

* :mod:`fedpeft.privacy.accounting`: epsilon of the Poisson-subsampled Gaussian mechanism
  (``dp_accounting``: RDP or PLD) and noise calibration to a target epsilon.
* :mod:`fedpeft.privacy.example_level`: DP-SGD in a client's local training (Opacus).

Nothing is imported here, so importing one module does not load the others' libraries
(``dp_accounting`` alone takes about a second to import).
"""
