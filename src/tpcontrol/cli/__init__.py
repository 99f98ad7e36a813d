"""`tpcontrol`'s command line (`main`): on top of every other package; nothing imports it."""
