from shmdedup.cli import main

raise SystemExit(main())
