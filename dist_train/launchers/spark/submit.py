"""spark-submit's entry file (spark-submit takes a Python file, not a module):

    spark-submit --master 'local[2]' "$(python -c 'import dist_train.launchers.spark.submit as m; print(m.__file__)')" CONFIG

`dist-train spark` passes it; a checkout's launchers/spark.py does the same.
"""

import atexit
import os
import sys
import threading

if __name__ == "__main__":
    from dist_train.launchers.spark.session import session

    if not {"-h", "--help"} & set(sys.argv):
        # the JVM builds the SparkContext (~3 s) while Python imports torch and checks the job;
        # main()'s session() then returns this one (getOrCreate holds a lock meanwhile)
        threading.Thread(target=session, daemon=True, name="dist-train-spark-start").start()
    from dist_train.launchers.spark import driver

    code = driver.main()  # (a failure raises SystemExit with its code: Python's own exit follows)
    # Done, its outputs written: leave without the interpreter's teardown (~0.6 s of a short job's
    # wall time here: pyspark's and torch's modules and objects dismantled one by one); what
    # asked to run at exit still does.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
