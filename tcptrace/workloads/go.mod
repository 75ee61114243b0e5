module tcptraceworkloads

go 1.19
