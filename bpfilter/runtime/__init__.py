"""Running rulesets: loading compiled programs and filling their maps (runner), putting
them live on interfaces and swapping them (deploy), what stays pinned between commands
(state), the connection table (conntable), address edits in place (inplace) and the LOG
reader (logs). Nothing here knows iptables or nftables syntax."""
