"""Bundles: a basis file plus one small file per task; see ``docs/FORMAT.md``.

- :mod:`~supsup_deploy.bundles.format`: file names, versions, hashing and the records a bundle
  holds;
- :mod:`~supsup_deploy.bundles.validation`: every check that turns a bad file into a
  :class:`~supsup_deploy.errors.FormatError` (``docs/SECURITY.md``);
- :mod:`~supsup_deploy.bundles.writer`: :func:`save_bundle`, :func:`save_basis`, :func:`save_task`;
- :mod:`~supsup_deploy.bundles.reader`: :func:`load_bundle` and :class:`Bundle`;
- :mod:`~supsup_deploy.bundles.weights`: one task's class names, input transform and model.
"""
