import gc

from imgft.cli import main

main()
gc.freeze()  # a faster exit, as in imgft.errors.run_as_script
