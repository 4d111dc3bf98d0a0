"""Launchers: each turns a launch environment (a process, mpirun, a Spark barrier task)
into a Communicator and a data shard, then calls the shared core's `fit`."""
