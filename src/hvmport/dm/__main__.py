import sys

from hvmport.dm.main import main

sys.exit(main())
