from distill.cli import main

# spawned workers (distill/launch.py, teachers) import this module again: only run as a program
if __name__ == "__main__":
    main()
