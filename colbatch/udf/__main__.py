"""`python -m colbatch.udf FD`: a UDF worker process, started by `ProcessPool` with its end of a socket pair."""

import sys
from multiprocessing.connection import Connection

from colbatch.udf.worker import exit_quietly, process_main

if __name__ == "__main__":
    process_main(Connection(int(sys.argv[1])))
    exit_quietly()
