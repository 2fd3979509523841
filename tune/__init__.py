"""Ray Tune searches over the dotted config keys: named spaces (tune.spaces) and the Tuner (tune.search)."""
