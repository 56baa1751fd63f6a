"""Load an mmsim server with Locust: every user has its own process and runs the "mixed" tasks
(remap, remap64, walk, walk_blocking, fork_exit, write, read, mmap_munmap, batch, stream) with no
wait between them. Needs the extra: ``pip install 'mmsim[locust]'`` (``make run`` installs it).

    make run                                                     # first terminal: the server on 127.0.0.1:7077

    # headless: 20 users, 5 more a second, 10 seconds, then the summary
    locust -f examples/locust/locustfile.py --headless -u 20 -r 5 -t 10s --host 127.0.0.1:7077

    # the web UI on http://localhost:8089 (users, rate and host are set there)
    locust -f examples/locust/locustfile.py --host 127.0.0.1:7077

    # distributed: one master, and workers on as many machines as needed (the server must listen
    # where they can reach it: mmsim serve --listen 0.0.0.0:7077 --token-file FILE)
    locust -f examples/locust/locustfile.py --master --host SERVER:7077                 # on one machine
    locust -f examples/locust/locustfile.py --worker --master-host MASTER               # on each load machine

Operations that end with the kernel's errno are reported as successes named ``remap [EBUSY]`` and
counted at the end; any other gRPC error is a Locust failure (and a non-zero exit status).
"""

from locust import constant

from mmsim.loadgen.locust import MmsimUser


class Mixed(MmsimUser):
    wait_time = constant(0)
