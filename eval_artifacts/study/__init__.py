"""What a study is: its typed config, the levels table and the error classes. Imports nothing else of ours."""
