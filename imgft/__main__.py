from imgft.commands.cli import main
from imgft.errors import skip_final_collection

main()
skip_final_collection()
