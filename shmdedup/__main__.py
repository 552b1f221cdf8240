from shmdedup.tools.cli import main

raise SystemExit(main())
