# Makes inventory.py importable by the tests and by the handler processes they start.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
