"""txfaas's HTTP server side: the limited ``Site`` every process serves with."""
