"""`python -m diversed.sandbox`: report this host's isolation level and the default limits."""

import json
from dataclasses import asdict

from . import Limits, isolation

print(json.dumps({**isolation(), **asdict(Limits())}, indent=2))
