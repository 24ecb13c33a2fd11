import os
import sys


# Before torch is imported: pytest-xdist runs one worker per core, so one thread each, and threads that wait
# passively (OpenMP's default spin-waiting makes shared CPU cores crawl).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
