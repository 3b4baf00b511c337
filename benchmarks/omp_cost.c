/* What OpenMP synchronisation costs with 2 threads: an empty parallel region, a barrier inside one
 * region, and an `omp for schedule(dynamic, 1)` of 4 iterations (with its barrier); microseconds
 * each, over 200,000 of them. The kernels' comments on regions against barriers cite it.
 *
 *     gcc -O2 -fopenmp benchmarks/omp_cost.c -o /tmp/omp_cost && /tmp/omp_cost
 */
#include <omp.h>
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
int main(){
  volatile int x=0; int N=200000;
  #pragma omp parallel num_threads(2)
  { x++; }
  double t0=now();
  for(int i=0;i<N;i++){
    #pragma omp parallel num_threads(2)
    { x++; }
  }
  double t1=now();
  #pragma omp parallel num_threads(2)
  {
    for(int i=0;i<N;i++){
      #pragma omp barrier
    }
  }
  double t2=now();
  #pragma omp parallel num_threads(2)
  {
    for(int i=0;i<N;i++){
      #pragma omp for schedule(dynamic,1)
      for (int j=0;j<4;j++) x++;
    }
  }
  double t3=now();
  printf("region %.3f us, barrier %.3f us, omp-for-dynamic %.3f us\n",(t1-t0)/N*1e6,(t2-t1)/N*1e6,(t3-t2)/N*1e6);
}
