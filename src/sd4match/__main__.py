from sd4match.cli import main

raise SystemExit(main())
