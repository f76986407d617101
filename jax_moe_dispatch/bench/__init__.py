"""Benchmarks of jax_moe_dispatch: ``python -m jax_moe_dispatch.bench --help``.

The CLI runs one *suite* (``--suite``, default ``dispatch``): one table of
results, printed as it fills, repeated between ``==== RESULTS ====`` and
``==== END RESULTS ====`` at the end, and written as CSV (``--csv``) and a PNG
bar chart (``--plot``). The modules, one job each:

* :mod:`.cli`: the flags common to all suites, the ``SUITES`` registry, the
  header and results block, the exit status (1 on any FAIL or ERROR);
* :mod:`.session`: :class:`~.session.Suite` (what a suite provides) and
  :class:`~.session.Session` (what it runs in: flags, devices, time budget,
  notes, failures, rows);
* :mod:`.timing`: device time of any function (a chain of calls in one
  jitted ``fori_loop``, no data copied per call) and host time;
* :mod:`.report`: the printed table, the CSV file and the bar chart;
* the ``dispatch`` suite: :mod:`.dispatch` (rows, flags, the plan of each
  configuration, timing), :mod:`.dispatch_case` (one configuration's data and
  ops), :mod:`.ops` (every call of the library's public API, and the JAX
  baselines) and :mod:`.checks` (outputs against :mod:`jax_moe_dispatch.testing.oracle`,
  the NumPy oracle the tests use too).

Adding a table: write a module that defines a row dataclass, its printed
columns, its flags, a ``setting`` line, ``run(session)`` (time with
:func:`.timing.device_time`, add rows with ``session.add``) and ``plot``,
bundled as ``SUITE = Suite(...)``; then add that ``SUITE`` to the tuple that
builds ``cli.SUITES``.
"""

from jax_moe_dispatch.bench.cli import SUITES, main

__all__ = ["SUITES", "main"]
