"""`python -m colbatch.udf FD`: a UDF worker process, started by `ProcessPool` with its end of a socket pair.

`python -m colbatch.udf --zygote FD`: the process UDF workers are forked from (`colbatch.udf.zygote`).
"""

import sys
from multiprocessing.connection import Connection

from colbatch.exits import exit_quietly

if __name__ == "__main__":
    if sys.argv[1] == "--zygote":
        from colbatch.udf.zygote import serve

        serve(int(sys.argv[2]))
    else:
        from colbatch.udf.worker import process_main

        process_main(Connection(int(sys.argv[1])))
    exit_quietly()
