"""Atom dashboards for WriteSAEs: what an atom fires on, its key and value sides, what substituting it does,
and how long it lives in the state (``writesae dashboard``).

* :func:`compute_dashboard` (``compute.py``): one streaming pass over the data for every atom, then the value
  sides and measured effects at each atom's top firings.
* :func:`write_dashboard` (``site.py``): the static site and a documented JSON per atom (``ATOM_SCHEMA``);
  :func:`load_atom` reads one back.
* :func:`write_neuronpedia` (``neuronpedia.py``): Neuronpedia's upload format.
"""

from .compute import DashboardConfig, DashboardData, atom_factors, compute_dashboard
from .site import ATOM_SCHEMA, load_atom, write_dashboard
from .stats import AtomStats, StatsConfig

__all__ = ["ATOM_SCHEMA", "AtomStats", "DashboardConfig", "DashboardData", "StatsConfig", "atom_factors",
           "compute_dashboard", "load_atom", "write_dashboard"]
