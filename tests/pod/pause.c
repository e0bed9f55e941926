/* The test pods' image: a static binary that is both the pause process of a sandbox
 * (no arguments: sleeps until SIGTERM or SIGINT) and a container's probe
 * (`/pause connect ADDR PORT [DELAY_MS]`: one TCP connect, after DELAY_MS; prints OK,
 * EPERM or ERR <errno> and exits 0, 1, 3 (refused) or 2). Built by the test with `cc -static`. */
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void bye(int sig) { (void)sig; _exit(0); }

int main(int argc, char **argv) {
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "connect") == 0) {
        if (argc == 5)
            usleep((useconds_t)atoi(argv[4]) * 1000);
        struct sockaddr_in sa;
        memset(&sa, 0, sizeof sa);
        sa.sin_family = AF_INET;
        sa.sin_port = htons((unsigned short)atoi(argv[3]));
        if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1) {
            puts("ERR bad-address");
            return 2;
        }
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            printf("ERR %d\n", errno);
            return 2;
        }
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            puts("OK");
            return 0;
        }
        int e = errno;
        if (e == EPERM) {
            puts("EPERM");
            return 1;
        }
        printf("ERR %d\n", e);
        return e == ECONNREFUSED ? 3 : 2;
    }
    signal(SIGTERM, bye);
    signal(SIGINT, bye);
    for (;;)
        pause();
}
