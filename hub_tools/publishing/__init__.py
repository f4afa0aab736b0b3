"""Publishing a study to the Hub: wanted state (spec), state.json, plan, apply, restore, and the commands."""
